"""Speed and memory: runtime options (compile, offload, step caches, guidance truncation, host memory).

See :mod:`wanpipe.runtime.options` for the options object and how the CLI wires it.
"""

from wanpipe.runtime.options import (
    RuntimeOptions,
    add_runtime_arguments,
    apply_runtime_options,
    options_from_args,
)

__all__ = ["RuntimeOptions", "add_runtime_arguments", "apply_runtime_options", "options_from_args"]
