"""The platform room: ``megatron`` (the one Megatron-Core seam), ``distributed`` (process
groups), ``parallel`` (the one parallel value: degrees, groups, this rank's coordinates),
``cpu`` (Megatron on a machine without CUDA, switched on by entry points), ``environment``
(CUDA / Transformer Engine checks), ``hardware`` (GPU facts, torch-free). Import the modules
directly."""
