"""The platform room: ``megatron`` (the one Megatron-Core seam), ``distributed`` (process
groups), ``parallel`` (the one parallel value: degrees, groups, this rank's coordinates),
``cpu`` (Megatron on a machine without CUDA, switched on by entry points), ``machine`` (the one
probe of this machine: ``probe_machine``, ``torch_device``), ``environment`` (Transformer
Engine / extensions installed), ``hardware`` (GPU facts, torch-free). Import the modules
directly."""
