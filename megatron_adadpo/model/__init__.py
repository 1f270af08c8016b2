"""The model room: ``config`` (the Llama-family description, torch-free), ``build``
(Megatron ``TransformerConfig`` and ``GPTModel`` chunks), ``norm`` (sequence-parallel RMSNorm),
``initialization`` (layout-independent weights). Import the modules directly."""
