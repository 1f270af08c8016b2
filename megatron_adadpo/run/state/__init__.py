"""The run's reliability wing: what it leaves on disk and how it comes back. ``run_dir`` (the
directory layout, atomic publishing of ``iter_N``, ``latest``), ``lock`` (one run per directory),
``checkpoints`` (``dist_checkpointing`` saves and loads: model, optimizer, RNG, adapters, TR-DPO's
reference), ``checkpoint_writer`` (fully parallel, asynchronous writes and their publishing),
``resume`` (the run state and what a resumed run must agree on), ``consistency`` (checkpoints,
tokenizers and precomputed references against the config). Import the modules directly."""
