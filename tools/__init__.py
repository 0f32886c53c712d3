"""dagc.tools: the commands on top of the core, trainer, compiler and runtime (CLI, bench, exports, evaluate)."""
