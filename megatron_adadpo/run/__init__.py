"""The run room: ``opening`` (groups, run directory, data, where the run starts; a finished
run), ``trainer`` (typed state and loop), ``batches`` (micro-batches in training order),
``microbatch`` (the typed micro-batch: CP split, device move, attention inputs), ``step``
(Megatron's forward_step / loss_func contract), ``reference`` (resident or precomputed),
``optimizer`` (DDP, optimizer, schedule), ``checkpoints``, ``resume`` (the run state and what a
resumed run must agree on), ``metrics``, ``evaluation``, ``precompute``. Import the modules
directly."""
