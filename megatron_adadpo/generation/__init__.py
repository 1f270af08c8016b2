"""Text generation from a trained policy, for evaluation.

``prompts``: read a prompts file (the training data's ``prompt`` field, or AlpacaEval's
``instruction``), render each prompt exactly as training did (``data.templates`` +
``data.tokenize.encode_prompt``: chat template or plain template, one BOS) and write
AlpacaEval-style records (``instruction``, ``output``, ``generator``). ``policy``: load a
checkpoint saved at any layout into a TP1 / PP1 model in one process. ``decode``: batched greedy
or temperature sampling with Megatron-Core's KV cache (``StaticInferenceContext``).
``tools/generate.py`` is the command line.
"""
