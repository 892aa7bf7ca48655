"""Device redundancy on the source (lifecycle steps 3 and 7; issue 5).

Entry points:
- ``build.build(plan, journal, BuildOptions()) -> BuildResult``: drivers, initramfs, bonds, NBD legs;
  every change journaled; rolled back on failure (``BuildError``); ``build.verify_plan`` refuses a
  plan for devices that vanished (``PlanError``) before anything changes.
- ``build.wait_mirrors(journal, timeout_s, on_progress=...)``: until every network leg is in sync
  (``mdmirror.LegStatus`` per poll, for progress in ``watch``); raises ``mdmirror.MirrorError``.
- ``journal.Journal.create(path, migration_id)`` / ``.load(path)`` / ``.report()`` (for V).
- ``rollback.rollback(journal, rollback.real_undoers())``: undo in reverse order.
- ``cancel.cancel(journal, ids)``: inside the VM, on V's instruction, listed ids only.
CLI: ``python3 -m source_agent.redundancy --help``.
"""
