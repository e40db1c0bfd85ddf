"""containerd NRI plugin that injects NVIDIA GPUs as spec-visible container adjustments.

Layers (imports point down only):
  wire     -- NRI/ttrpc/mux protocol, asyncio stub (knows nothing about GPUs)
  request  -- NRI container -> hook model -> resolved GPU request (pure)
  host     -- host driver discovery under configurable roots
  adjust   -- resolved request + host snapshot -> ContainerAdjustment (pure)
  daemon   -- CLI, config, logging, metrics glue (cli.py, config.py, plugin.py, ...)
"""

__version__ = "0.3.0"
