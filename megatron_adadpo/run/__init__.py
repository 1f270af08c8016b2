"""The run room: ``opening`` (the resolved run, groups, run directory, data, where the run
starts; a finished run), ``trainer`` (typed state and loop), ``batches`` (micro-batches in
training order), ``microbatch`` (the typed micro-batch: CP split, device move, attention
inputs), ``step`` (Megatron's forward_step / loss_func contract), ``sequences`` (per-token
values to per-sequence sums: LD-DPO, WPO, TRL's token metrics), ``reference`` (resident, adapters
off, or precomputed; TR-DPO's updates), ``optimizer`` (DDP, optimizer, schedule), ``metrics``,
``evaluation``, ``precompute``, ``preemption`` (SIGTERM), ``datasets``, ``context_parallel``
(zigzag positions). What a run leaves on disk and how it comes back is the ``state`` wing.
Import the modules directly."""
