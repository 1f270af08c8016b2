"""The run room: ``trainer`` (state and loop), ``batches`` (micro-batches in training order),
``step`` (Megatron's forward_step / loss_func contract), ``reference`` (resident or
precomputed), ``optimizer`` (DDP, optimizer, schedule), ``checkpoints``, ``metrics``,
``evaluation``, ``precompute``. Import the modules directly."""
