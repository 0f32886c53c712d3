"""dagc.runtime: load a compiled artifact and run any subset of its tasks.

    from dagc.runtime import load
    engine = load("art/a", backend="auto")
    outputs = engine.run(images, tasks=["depth"])   # task -> numpy array

See `dagc.runtime.engine` for backends and errors, `dagc.runtime.images` for reading image files
and writing outputs (``dagc run``).
"""

from dagc.runtime.engine import BACKENDS, ArtifactError, Engine, InputError, load

__all__ = ["load", "Engine", "ArtifactError", "InputError", "BACKENDS"]
