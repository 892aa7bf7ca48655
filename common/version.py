"""Protocol and software versions, and the capabilities this build offers."""

# 4: ResolveCutover (V keeps an undecided image loaded for P's word); 3: the image socket's WARM
# frames; 2: xxh64 page hashes and checksums (1: xxh3)
PROTOCOL_VERSION = 4
MIN_PROTOCOL_VERSION = 3
AGENT_VERSION = "0.1.0"

# What this build can do on the wire; negotiation keeps the intersection.
CAPABILITIES = ("zstd", "multistream", "resume", "dedup-hash", "round-sync", "bulk-socket", "image-pass")
#: V takes PASS frames on its image socket (the cutover helper's pass right before FREEZE)
IMAGE_PASS_CAPABILITY = "image-pass"

# gRPC metadata key every agent-to-agent call carries, so a server refuses a peer
# speaking another protocol before it touches any state.
PROTOCOL_METADATA_KEY = "p2v-protocol"


def supported(version: int) -> bool:
    return MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION
