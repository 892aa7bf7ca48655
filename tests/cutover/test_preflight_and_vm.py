"""Pure policy of the carrier: the pre-flight verdict, V's firmware map model, the waiting VM's
libvirt XML, the check of the booted VM's facts against P's, the resume plan."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from common.hibernate_image import MemmapEntry
from common.preflight import check_carrier, lockdown_selected, memmap_difference, merge_into_verdict
from dest_agent import vm_builder
from dest_agent.waiting_vm import SourceFacts, check_facts, parse_shared_disk
from p2v.v1 import destination_pb2, source_pb2
from source_agent.resume import NicFacts, garp_frame, plan_resume

GIB = 1 << 30
#: P in the rig: 1 GiB, QEMU pc, e1000 + IDE (as its kernel reported it)
P_MAP = [(0, 0x9FC00, "System RAM"), (0x9FC00, 0xA0000, "Reserved"), (0xF0000, 0x100000, "Reserved"),
         (0x100000, 0x3FFE0000, "System RAM"), (0x3FFE0000, 0x40000000, "Reserved"),
         (0xFFFC0000, 0x100000000, "Reserved"), (0xFD00000000, 0x10000000000, "Reserved")]


def inventory(**over) -> source_pb2.Inventory:
    inv = source_pb2.Inventory(
        kernel_release="6.1.0-56-amd64", cpu_model="QEMU Virtual CPU version 2.5+", memory_bytes=GIB,
        mem_available_bytes=800 << 20, snapshot_device=True, lockdown="none",
        firmware_memmap=[source_pb2.FirmwareMemoryEntry(start=s, end=e, type=t) for s, e, t in P_MAP])
    for k, v in over.items():
        setattr(inv, k, v)
    return inv


def catalog(memory_bytes: int = GIB, **over) -> destination_pb2.VirtualDeviceCatalog:
    cat = destination_pb2.VirtualDeviceCatalog(
        max_memory_bytes=64 * GIB, free_disk_bytes=100 * GIB, kernel_releases=["6.1.0-56-amd64"],
        vm_cpu_model="QEMU Virtual CPU version 2.5+", cutover_supported=True,
        vm_firmware_memmap=[destination_pb2.MemoryRange(start=e.start, end=e.end, type=e.type)
                            for e in vm_builder.predict_memmap(memory_bytes)])
    for k, v in over.items():
        if isinstance(v, list):
            del getattr(cat, k)[:]
            getattr(cat, k).extend(v)
        else:
            setattr(cat, k, v)
    return cat


def codes(reasons) -> set[str]:
    return {r.code for r in reasons if r.blocking}


def test_v_model_reproduces_ps_map_and_check_passes() -> None:
    assert [(e.start, e.end, e.type) for e in vm_builder.predict_memmap(GIB)] == P_MAP
    assert codes(check_carrier(inventory(), catalog())) == set()


def test_memory_size_v_cannot_match_is_refused() -> None:
    reasons = check_carrier(inventory(), catalog(max_memory_bytes=512 << 20))
    assert "memory-size" in codes(reasons)
    msg = next(r.message for r in reasons if r.code == "memory-size")
    assert "1024 MiB" in msg and "512 MiB" in msg
    verdict = merge_into_verdict(source_pb2.CheckVerdict(ok=True), reasons)
    assert not verdict.ok


def test_firmware_map_mismatch_is_refused() -> None:
    # V predicts the map for another memory size: the kernel would refuse the image
    reasons = check_carrier(inventory(), catalog(memory_bytes=2 * GIB))
    assert "firmware-map" in codes(reasons)
    assert "entry 3" in next(r.message for r in reasons if r.code == "firmware-map")
    assert "firmware-map" in codes(check_carrier(inventory(), catalog(vm_firmware_memmap=[])))


@pytest.mark.parametrize("over, code", [
    ({"snapshot_device": False}, "snapshot-device"),
    ({"lockdown": "[integrity] none"}, "lockdown"),
    ({"mem_available_bytes": 300 << 20}, "image-fits-ram"),
    ({"kernel_release": "6.1.0-99-amd64"}, "kernel"),
    ({"cpu_model": "Intel(R) Xeon(R) Gold 6338"}, "cpu-model"),
])
def test_each_source_side_refusal(over, code) -> None:
    assert code in codes(check_carrier(inventory(**over), catalog()))


def test_destination_side_refusals() -> None:
    assert "disk-space" in codes(check_carrier(inventory(), catalog(free_disk_bytes=GIB)))
    assert "destination-cutover" in codes(check_carrier(inventory(), catalog(cutover_supported=False)))


def test_lockdown_parsing_and_memmap_difference() -> None:
    assert lockdown_selected("[none] integrity confidentiality") == "none"
    assert lockdown_selected("integrity") == "integrity"
    assert lockdown_selected("") == ""
    a = [MemmapEntry(0, 10, "System RAM")]
    assert memmap_difference(a, a) == ""
    assert "entries" in memmap_difference(a, [*a, MemmapEntry(10, 20, "Reserved")])


def test_predict_memmap_large_guest_splits_at_3g() -> None:
    m = vm_builder.predict_memmap(4 * GIB)
    assert (m[3].end, m[4].end) == (0xBFFE0000, 0xC0000000)
    assert (m[6].start, m[6].end, m[6].type) == (0x100000000, 0x140000000, "System RAM")
    with pytest.raises(ValueError):
        vm_builder.predict_memmap(GIB + 1)


def spec(**over) -> vm_builder.WaitingVmSpec:
    base = dict(
        name="p2vrig-vm-abc", uuid="5c1e0b6e-1d4a-5b1f-9a53-0c1d2e3f4a5b", memory_bytes=GIB, vcpus=1,
        kernel="/boot/vmlinuz-6.1.0-56-amd64", initrd="/var/lib/x/restore.cpio",
        cmdline="console=ttyS0 p2v.port=7480", nics=(vm_builder.VmNic("52:54:00:77:00:10", "p2vbr0"),),
        feed_nic=vm_builder.VmNic("52:54:00:77:00:20", "p2vbr0"),
        disks=(vm_builder.VmDisk("/var/lib/x/vda.img", "vda", serial="p2v-data"),
               parse_shared_disk("/var/lib/x/root.img:0:0:raw:P2V-ROOT", 0)),
        console_log="/var/lib/x/vm.console.log", control_socket="/var/lib/x/vm.ctl.sock",
        reserved_slots=frozenset({2}), run_as_root=True)
    base.update(over)
    return vm_builder.WaitingVmSpec(**base)


def test_domain_xml() -> None:
    root = ET.fromstring(vm_builder.domain_xml(spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "p2vrig-vm-abc" and root.findtext("uuid")
    assert int(root.findtext("memory")) == GIB // 1024
    assert root.find("os/type").get("machine") == "pc"
    assert root.findtext("os/kernel") == "/boot/vmlinuz-6.1.0-56-amd64"
    assert root.find("cpu/model").text == "qemu64"
    assert root.find("features/acpi") is not None
    macs = [i.find("mac").get("address") for i in root.findall("devices/interface")]
    assert macs == ["52:54:00:77:00:10", "52:54:00:77:00:20"]
    assert all(i.find("source").get("bridge") == "p2vbr0" for i in root.findall("devices/interface"))
    slots = [int(e.find("address").get("slot"), 16) for e in root.findall("devices/*") if
             e.find("address") is not None and e.find("address").get("type") == "pci"]
    assert 2 not in slots and len(set(slots)) == len(slots) == 3  # P's e1000 slot stays empty
    feed = next(i for i in root.findall("devices/interface") if i.find("mac").get("address") == "52:54:00:77:00:20")
    assert vm_builder.feed_nic_pci_address(spec()) == f"0000:00:{int(feed.find('address').get('slot'), 16):02x}.0"
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    assert disks["vda"].find("target").get("bus") == "virtio"
    assert disks["vda"].find("boot") is None  # no boot order: SeaBIOS must not touch it (e820)
    assert disks["hda"].find("shareable") is not None
    assert disks["hda"].find("address").get("unit") == "0"
    serials = root.findall("devices/serial")
    assert serials[0].find("source").get("append") == "on"
    assert serials[1].find("source").get("mode") == "bind"
    assert root.find("devices/controller[@type='usb']").get("model") == "none"
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("seclabel").get("relabel") == "no"
    ns = {"q": vm_builder.QEMU_NS}
    prop = root.find("q:override/q:device[@alias='ide0-0-0']/q:frontend/q:property", ns)
    assert prop is not None and prop.get("name") == "model" and prop.get("value") == "P2V-ROOT"


def test_domain_xml_refuses_bad_specs() -> None:
    with pytest.raises(ValueError):
        vm_builder.domain_xml(spec(memory_bytes=GIB + 4096))
    with pytest.raises(ValueError, match="position"):
        vm_builder.domain_xml(spec(disks=(vm_builder.VmDisk("/x", "hda", bus="ide"),)))
    with pytest.raises(ValueError, match="free PCI slots"):
        vm_builder.domain_xml(spec(reserved_slots=frozenset(range(32))))
    assert vm_builder.slot_of("0000:00:05.0") == 5 and vm_builder.slot_of("0000:01:00.0") is None
    for mib in (0, 48):
        with pytest.raises(ValueError, match="power of two"):
            vm_builder.domain_xml(spec(feed_ring="p2vrig-vm-abc-feed", feed_ring_mib=mib))


def test_feed_ring_is_an_ivshmem_device_on_a_slot_of_its_own() -> None:
    s = spec(feed_ring="p2vrig-vm-abc-feed", feed_ring_mib=64)
    layout = vm_builder.pci_layout(s)
    root = ET.fromstring(vm_builder.domain_xml(s))
    shmem = root.find("devices/shmem")
    assert shmem.get("name") == "p2vrig-vm-abc-feed" and shmem.find("model").get("type") == "ivshmem-plain"
    assert shmem.find("size").text == "64" and shmem.find("size").get("unit") == "M"
    assert int(shmem.find("address").get("slot"), 16) == layout.ring
    assert layout.ring not in (*layout.disks, *layout.nics, layout.feed, *s.reserved_slots)
    assert vm_builder.pci_layout(spec()).ring is None and ET.fromstring(vm_builder.domain_xml(spec())).find(
        "devices/shmem") is None


def test_booted_vm_facts_against_p() -> None:
    src = SourceFacts(GIB, "6.1.0-56-amd64", "#1 SMP Debian", [source_pb2.FirmwareMemoryEntry(
        start=s, end=e, type=t) for s, e, t in P_MAP], ["52:54:00:77:00:10"])
    vm = {"release": "6.1.0-56-amd64", "version": "#1 SMP Debian", "memmap": [list(x) for x in P_MAP]}
    assert check_facts(src, vm) == ""
    assert "build" in check_facts(src, {**vm, "version": "#2"})
    shifted = [list(x) for x in P_MAP]
    shifted[3][1], shifted[4][0] = 0x3FFDD000, 0x3FFDD000  # what a boot-time virtio-blk does
    assert "firmware memory map" in check_facts(src, {**vm, "memmap": shifted})


def test_resume_plan_order_and_garp() -> None:
    actions = plan_resume([NicFacts("eth0", "52:54:00:77:00:10", bond="p2vbond0")], [("md127", "sdb")],
                          ["eth0", "p2vbond0"], "52:54:00:77:00:20", [("p2vbond0", "10.77.0.10")])
    assert [a.name for a in actions] == ["rescan-pci", "remove-feed-nic", "adopt-nic", "lift-block", "announce",
                                         "fail-md-leg", "prune-stale-pci"]
    assert [a.name for a in actions if a.late] == ["prune-stale-pci"]  # after UNFREEZE
    frame = garp_frame("52:54:00:77:00:10", "10.77.0.10")
    assert len(frame) == 42 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x08\x06"
    assert frame[28:32] == frame[38:42] == bytes([10, 77, 0, 10])


def test_the_commit_gate_comes_before_anything_that_may_send() -> None:
    """With V's ring address the resume waits for P's COMMIT after the NICs' probing and before the
    first step that may put a frame on the network; a rehearsal or an unusable address: no gate."""
    from source_agent.cutover import commit_gate_args

    gate = commit_gate_args(0xFE800000, b"\x01" * 32, "mig", rehearse=False)
    assert gate == {"address": 0xFE800000, "token": "01" * 32, "migration_id": "mig"}
    for address, rehearse in ((0xFE800000, True), (0, False), (0xFE800010, False)):
        assert commit_gate_args(address, b"\x01" * 32, "mig", rehearse) is None
    actions = plan_resume([NicFacts("eth0", "52:54:00:77:00:10", bond="p2vbond0")], [], ["p2vbond0"],
                          "52:54:00:77:00:20", [("p2vbond0", "10.77.0.10")], feed_address="0000:00:05.0",
                          vm_nics=["0000:00:04.0"], commit_gate=gate)
    assert [a.name for a in actions if not a.late] == ["enable-slots", "remove-feed-nic", "await-commit",
                                                       "adopt-nic", "lift-block", "announce"]
    assert actions[2].args == gate


def test_a_failed_commit_gate_stops_the_resume(tmp_path) -> None:
    """await-commit that cannot even start (a malformed token) must not be stepped over: the steps
    that would put P's addresses on the network do not run and the resume says the OS must stay
    frozen. Any other failed step leaves the rest to run (the only way is forward)."""
    from source_agent import resume

    ran: list[str] = []

    def step(name: str):
        return lambda **_: ran.append(name) or "done"

    registry = {n: step(n) for n in ("enable-slots", "adopt-nic", "lift-block", "announce")}
    registry["await-commit"] = resume.await_commit  # the real gate, on a ring file of zeros
    ring = tmp_path / "ring"
    ring.write_bytes(bytes(4096))
    plan = [resume.ResumeAction("enable-slots"),
            resume.ResumeAction("await-commit", {"address": 0, "token": "not hex", "migration_id": "m",
                                                 "memory_path": str(ring)}),
            resume.ResumeAction("adopt-nic"), resume.ResumeAction("lift-block"), resume.ResumeAction("announce")]
    marks: list[str] = []
    results = resume.run_resume(plan, registry, mark=marks.append)
    assert ran == ["enable-slots"]
    assert marks[0] == "enable-slots: ok done (0 ms)"
    assert marks[1].startswith("await-commit: FAILED ValueError") and len(marks) == 2
    assert [(r.name, r.ok) for r in results] == [("enable-slots", True), ("await-commit", False),
                                                 ("adopt-nic", False), ("lift-block", False), ("announce", False)]
    assert "ValueError" in results[1].detail and results[2].detail == resume.NOT_RUN
    assert resume.halted(results)

    def broken(**_):
        raise RuntimeError("no NIC")

    ran.clear()
    registry["adopt-nic"] = broken
    results = resume.run_resume([plan[0], plan[2], plan[3]], registry)
    assert ran == ["enable-slots", "lift-block"] and not resume.halted(results)


def test_resume_steps_are_marked_in_the_kernel_log(tmp_path) -> None:
    from source_agent import resume

    log = tmp_path / "kmsg"
    log.write_text("")
    mark = resume.kernel_log_marker(str(log))
    resume.run_resume([resume.ResumeAction("lift-block")], {"lift-block": lambda: "lifted"}, mark=mark)
    assert log.read_text().splitlines() == ["<6>p2v-resume: lift-block: ok lifted (0 ms)"]
    resume.kernel_log_marker(str(tmp_path / "absent" / "kmsg"))("nothing happens")  # no log: no error


def test_installed_ram_from_the_firmware_map() -> None:
    from common.preflight import installed_ram_bytes

    entries = [source_pb2.FirmwareMemoryEntry(start=s, end=e, type=t) for s, e, t in P_MAP]
    assert installed_ram_bytes(entries) == GIB  # MemTotal would be ~40 MiB less
    big = [destination_pb2.MemoryRange(start=e.start, end=e.end, type=e.type)
           for e in vm_builder.predict_memmap(6 * GIB)]
    assert installed_ram_bytes(big) == 6 * GIB
    src = SourceFacts.from_prepare(destination_pb2.PrepareRequest(
        memory_bytes=GIB - (40 << 20) - 4096, firmware_memmap=[destination_pb2.MemoryRange(
            start=s, end=e, type=t) for s, e, t in P_MAP]))
    assert src.memory_bytes == GIB


def test_resume_plan_from_inventory_and_journal() -> None:
    from source_agent.cutover import plan_for
    from source_agent.redundancy.journal import Entry

    inv = source_pb2.Inventory(
        nics=[source_pb2.Nic(name="eth0", mac="52:54:00:77:00:10", pci_address="0000:00:02.0", master="p2vbond0"),
              source_pb2.Nic(name="p2vbond0", mac="52:54:00:77:00:10", kind="bond", addresses=["10.77.0.10/24"]),
              source_pb2.Nic(name="eth9", mac="52:54:00:77:00:99", pci_address="0000:00:09.0",
                             addresses=["10.88.0.5/24", "fe80::1/64"])],
        routes=[source_pb2.Route(destination="default", gateway="10.88.0.1", device="eth9")],
        block_devices=[source_pb2.BlockDevice(name="md127", kind="md", md_members=["sdb", "nbd0"]),
                       source_pb2.BlockDevice(name="sdb", kind="disk", pci_address="0000:00:01.1"),
                       source_pb2.BlockDevice(name="nbd0", kind="nbd"),
                       source_pb2.BlockDevice(name="md5", kind="md", md_members=["sdc"]),
                       source_pb2.BlockDevice(name="sdc", kind="disk", pci_address="0000:00:01.1")])
    journal = [Entry("b1", "bond", physical="eth0", state="done", detail={"bond": "p2vbond0"}),
               Entry("m1", "md-leg", physical="md127", state="done", detail={"md": "md127", "leg": "/dev/nbd0"})]
    actions = plan_for(inv, journal, ["eth0", "p2vbond0", "eth9"], "52:54:00:77:00:20")
    by_name = [(a.name, a.args) for a in actions]
    # only the array p2v gave a network leg loses its physical member; md5 (no leg) is left alone
    assert ("fail-md-leg", {"md": "md127", "member": "sdb"}) in by_name
    assert not any(a["md"] == "md5" for n, a in by_name if n == "fail-md-leg")
    adopt = [a for n, a in by_name if n == "adopt-nic"]
    assert adopt[0]["bond"] == "p2vbond0" and adopt[0]["addresses"] == []
    assert adopt[1]["bond"] == "" and adopt[1]["addresses"] == [("10.88.0.5", 24)]
    assert adopt[1]["routes"] == [("", 0, "10.88.0.1")]
    announce = [a for n, a in by_name if n == "announce"]
    assert {"interface": "p2vbond0", "ip": "10.77.0.10"} in announce
    assert {"interface": "", "ip": "10.88.0.5"} in announce


def test_remove_feed_nic_removes_the_pci_function_above_the_virtio_device(tmp_path, monkeypatch) -> None:
    from source_agent import resume
    from tests.redundancy import fakesys

    # sysfs as the VM has it: eth2 -> virtio2 -> PCI function 0000:00:05.0 (only that one can be removed)
    pci = fakesys.pci_function(tmp_path, "0000:00:05.0", "1af4", "1000", "virtio-pci")
    fakesys.nic(tmp_path, "eth2", f"{pci}/virtio2")
    fakesys.write(tmp_path, "/sys/class/net/eth2/address", "52:54:00:77:00:20\n")
    fakesys.link(tmp_path, "/sys/bus/pci/devices/0000:00:05.0", pci)
    monkeypatch.setattr(resume, "SYS", tmp_path / "sys")
    assert resume.remove_feed_nic("52:54:00:77:00:20") == "removed eth2 (0000:00:05.0)"
    assert (tmp_path / pci.lstrip("/") / "remove").read_text() == "1"
    assert not (tmp_path / pci.lstrip("/") / "virtio2" / "remove").exists()


def test_feed_nic_is_removed_before_any_driver_binds_it(tmp_path, monkeypatch) -> None:
    """rescan-pci with `skip`, against a stand-in for the kernel's sysfs (pure sequencing; the real
    one runs in the rig's whole-OS move): PCI functions bind virtio-pci at once, their virtio
    devices wait while the virtio bus's autoprobe is off."""
    from source_agent import resume

    sysfs = tmp_path / "sys"
    pci, virtio = sysfs / "bus/pci/devices", sysfs / "bus/virtio/devices"
    pci.mkdir(parents=True)
    virtio.mkdir(parents=True)
    log: list[str] = []
    new = {"0000:00:03.0": "virtio0", "0000:00:04.0": "virtio1", "0000:00:05.0": "virtio2"}  # disk, NIC, feed

    def kernel_write(path, value: str) -> None:
        rel = str(path.relative_to(sysfs))
        log.append(f"{rel}={value}")
        autoprobe = log.count("bus/virtio/drivers_autoprobe=0") == log.count("bus/virtio/drivers_autoprobe=1")
        if rel == "bus/pci/rescan":
            for fn, vdev in new.items():
                (pci / fn).mkdir()
                (virtio / vdev).mkdir()
                if autoprobe:
                    (virtio / vdev / "driver").mkdir()
        elif rel.endswith("/remove"):
            fn = path.parent.name
            assert not (virtio / new[fn] / "driver").exists(), "the feed NIC was probed"
            (virtio / new[fn]).rmdir()
            path.parent.rmdir()
        elif rel == "bus/virtio/drivers_probe":
            (virtio / value / "driver").mkdir()

    monkeypatch.setattr(resume, "SYS", sysfs)
    monkeypatch.setattr(resume, "_write", kernel_write)
    detail = resume.rescan_pci(skip="0000:00:05.0")
    assert log == ["bus/virtio/drivers_autoprobe=0", "bus/pci/rescan=1", "bus/pci/devices/0000:00:05.0/remove=1",
                   "bus/virtio/drivers_autoprobe=1", "bus/virtio/drivers_probe=virtio0",
                   "bus/virtio/drivers_probe=virtio1"]
    assert detail == "rescanned, 0000:00:05.0 removed unprobed; probed virtio0, virtio1"
    assert resume.remove_feed_nic("52:54:00:77:00:20", address="0000:00:05.0").startswith("feed NIC 0000:00:05.0")
    actions = plan_resume([], [], [], "52:54:00:77:00:20", [], feed_address="0000:00:05.0")
    assert actions[0].args == {"skip": "0000:00:05.0"}
    assert actions[1].args == {"mac": "52:54:00:77:00:20", "address": "0000:00:05.0"}


def test_md_device_numbers_encode_as_the_kernel_does() -> None:
    from source_agent.resume import encode_dev

    assert encode_dev(8, 16) == 0x810  # sdb
    assert encode_dev(43, 0) == 0x2B00  # nbd0
    assert encode_dev(259, 300) == (300 & 0xFF) | (259 << 8) | ((300 & ~0xFF) << 12)  # minor > 255


def test_enable_slots_probes_only_the_functions_asked_for(tmp_path, monkeypatch) -> None:
    """The kernel's side stood in for (sysfs writes): which slots are enabled, when, and the fallback
    (pure sequencing; the real one runs in the rig's whole-OS move)."""
    from source_agent import resume

    sysfs = tmp_path / "sys"
    pci, slots = sysfs / "bus/pci/devices", sysfs / "bus/pci/slots"
    pci.mkdir(parents=True)
    for n in (3, 4, 5, 6):
        (slots / str(n)).mkdir(parents=True)
        (slots / str(n) / "address").write_text(f"0000:00:{n:02x}\n")
    log: list[str] = []

    def kernel_write(path, value: str) -> None:
        rel = str(path.relative_to(sysfs))
        log.append(f"{rel}={value}")
        if rel.startswith("bus/pci/slots/") and rel.endswith("/power"):
            (pci / f"{(path.parent / 'address').read_text().strip()}.0").mkdir()

    monkeypatch.setattr(resume, "SYS", sysfs)
    monkeypatch.setattr(resume, "_write", kernel_write)
    detail = resume.enable_slots(["0000:00:04.0"], later=["0000:00:03.0"], skip="0000:00:05.0")
    assert log == ["bus/pci/slots/4/power=1"] and detail == "enabled 0000:00:04.0"  # not the disk, not the feed
    assert resume.enable_slots(["0000:00:04.0"]) == "enabled nothing (all present)"
    assert resume.enable_slots(["0000:00:03.0"]) == "enabled 0000:00:03.0"  # the disk, late
    assert log[-1] == "bus/pci/slots/3/power=1"
    # a function missing after its slot was enabled is an error
    monkeypatch.setattr(resume, "_write", lambda path, value: log.append("nothing appears"))
    with pytest.raises(RuntimeError, match=r"no function at 0000:00:06\.0"):
        resume.enable_slots(["0000:00:06.0"])
    # no hotplug slot for one of them: everything by one rescan
    monkeypatch.setattr(resume, "rescan_pci", lambda skip="": f"rescanned, skipping {skip}")
    assert resume.enable_slots(["0000:00:04.0"], later=["0000:00:09.0"], skip="0000:00:05.0") == \
        "rescanned, skipping 0000:00:05.0 (no hotplug slots)"


def test_enable_slots_takes_the_power_files_found_before_the_cutover(tmp_path, monkeypatch) -> None:
    """Found on P (slot_power_files), written in the VM without scanning the slots again; a file that
    is not there after all sends it back to the scan."""
    from source_agent import resume

    sysfs = tmp_path / "sys"
    pci, slots = sysfs / "bus/pci/devices", sysfs / "bus/pci/slots"
    pci.mkdir(parents=True)
    for n in (3, 4):
        (slots / str(n)).mkdir(parents=True)
        (slots / str(n) / "address").write_text(f"0000:00:{n:02x}\n")
        (slots / str(n) / "power").write_text("0\n")
    monkeypatch.setattr(resume, "SYS", sysfs)
    found = resume.slot_power_files(["0000:00:04.0", "0000:00:03.0"])
    assert found == {"0000:00:04.0": slots / "4/power", "0000:00:03.0": slots / "3/power"}
    plan = plan_resume([], [], [], "", [], vm_nics=["0000:00:04.0"], vm_disks=["0000:00:03.0"],
                       slot_power={a: str(f) for a, f in found.items()})
    assert plan[0].args["power"] == {"0000:00:04.0": str(slots / "4/power"), "0000:00:03.0": str(slots / "3/power")}
    assert plan[-1].late and plan[-1].args["power"] == {"0000:00:03.0": str(slots / "3/power")}
    written: list[str] = []

    def kernel_write(path, value: str) -> None:
        written.append(str(path.relative_to(sysfs)))
        (pci / f"0000:00:{int(path.parent.name):02x}.0").mkdir()

    monkeypatch.setattr(resume, "_write", kernel_write)
    for n in (3, 4):  # a scan now would find nothing: only the files handed over can work
        (slots / str(n) / "address").unlink()
    assert resume.enable_slots(**plan[0].args) == "enabled 0000:00:04.0" and written == ["bus/pci/slots/4/power"]
    (slots / "3/power").unlink()  # not there in the VM: looked up again (here: no slots, so a rescan)
    monkeypatch.setattr(resume, "rescan_pci", lambda skip="": "rescanned")
    assert resume.enable_slots(**plan[-1].args) == "rescanned (no hotplug slots)"


def test_resume_plan_with_the_vm_layout() -> None:
    actions = plan_resume([NicFacts("eth0", "52:54:00:77:00:10", bond="p2vbond0")], [], ["p2vbond0"],
                          "52:54:00:77:00:20", [], feed_address="0000:00:05.0",
                          vm_nics=["0000:00:04.0"], vm_disks=["0000:00:03.0"])
    assert actions[0].name == "enable-slots" and not actions[0].late
    assert actions[0].args == {"addresses": ["0000:00:04.0"], "later": ["0000:00:03.0"], "skip": "0000:00:05.0"}
    assert [(a.name, a.args) for a in actions if a.late] == [
        ("prune-stale-pci", {}), ("enable-slots", {"addresses": ["0000:00:03.0"]})]


def test_pci_layout_is_what_the_domain_xml_uses() -> None:
    s = spec()
    layout = vm_builder.pci_layout(s)
    root = ET.fromstring(vm_builder.domain_xml(s))
    disks = [int(e.find("address").get("slot"), 16) for e in root.findall("devices/disk")
             if e.find("address") is not None and e.find("address").get("type") == "pci"]
    nics = [int(e.find("address").get("slot"), 16) for e in root.findall("devices/interface")]
    assert tuple(disks) == layout.disks and (*layout.nics, layout.feed) == tuple(nics)
    assert vm_builder.feed_nic_pci_address(s) == vm_builder.PciLayout.address(layout.feed)


CAPABILITIES = """<capabilities><host><uuid>x</uuid>
  <secmodel><model>apparmor</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+108</baselabel>
    <baselabel type='qemu'>+64055:+994</baselabel></secmodel>
</host></capabilities>"""


def test_qemu_dac_owner_from_the_host_capabilities() -> None:
    assert vm_builder.qemu_dac_owner(CAPABILITIES, run_as_root=False) == (64055, 994)
    assert vm_builder.qemu_dac_owner(CAPABILITIES, run_as_root=True) == (0, 0)
    assert vm_builder.qemu_dac_owner("<capabilities><host/></capabilities>", run_as_root=False) == (0, 0)


def test_ring_file_is_made_for_qemu_alone(tmp_path) -> None:
    import os
    import stat

    from dest_agent.waiting_vm import FeedError, FeedRing

    path = tmp_path / "vm-feed"
    path.write_bytes(b"old")  # a leftover goes
    vm_builder.create_ring_file(path, 1 << 20, (os.getuid(), os.getgid()))
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 20 and st.st_uid == os.getuid()
    FeedRing(path, 1 << 20).close()
    path.chmod(0o644)  # as QEMU would have made it
    with pytest.raises(FeedError, match="open to other users"):
        FeedRing(path, 1 << 20)
    with pytest.raises(FeedError, match="bytes"):
        FeedRing(path, 2 << 20)


@pytest.mark.parametrize("restored_ahead, start_fails", [(False, False), (True, False), (True, True)])
def test_rearm_replaces_a_vm_that_restored_ahead(tmp_path, restored_ahead: bool, start_fails: bool) -> None:
    """After an aborted cutover the waiting VM is reused, unless it restored P's image ahead of a
    COMMIT that never came (commit gate): that VM holds P's OS at the gate and must never be
    released, so a new one is built in its place (libvirt stands in: the rig builds real ones)."""
    from common.config import DestVmConfig
    from dest_agent.waiting_vm import WaitingVm

    config = DestVmConfig(image_address="127.0.0.1", feed_vm_ip="127.0.0.2/8")
    vm = WaitingVm(config, "m1", SourceFacts(4 << 20, "r", "v", [], []), tmp_path / "vm")
    calls: list[str] = []

    def start() -> None:
        calls.append("start")
        if start_fails:
            raise RuntimeError("no libvirt")

    vm.start = start  # type: ignore[method-assign]
    vm.connect_feed_in_background = lambda: calls.append("reconnect")  # type: ignore[method-assign]
    vm.started, vm.feed.restoring, vm.feed.facts = True, restored_ahead, {"release": "r"}
    vm.rearm()
    if vm._feed_thread is not None and restored_ahead:
        vm._feed_thread.join(5)
    assert calls == (["start"] if restored_ahead else ["reconnect"])
    assert vm.feed.facts == {}
    ok, why = vm.readiness()
    assert not ok
    if start_fails:
        assert "rebuilding the waiting VM failed: no libvirt" in why
    elif restored_ahead:
        assert "not started" in why  # a stand-in start() that did not start anything
