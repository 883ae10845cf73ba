"""Where and how a run executes: devices, compiler options, host memory, the workdir,
its lock and its checkpoints."""
