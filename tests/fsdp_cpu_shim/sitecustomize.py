"""Test-only shim: let accelerate run FSDP2 on CPU processes (gloo).

accelerate promotes a launch to FSDP only for GPU-like device types; on CPU it silently runs DDP
instead (measured on this project's CPU machines), which would make a CPU test of FSDP prove nothing. Loaded only by the `dist`
tests' subprocesses (PYTHONPATH=tests/fsdp_cpu_shim); never part of the package.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_CPU_SHIM") == "1":
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _original_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    _state.AcceleratorState.__init__ = _init
