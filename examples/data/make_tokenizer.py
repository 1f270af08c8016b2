"""Build the two tiny offline tokenizers bundled for tests and the quickstart.

- `tokenizer/`: a byte-level BPE Hugging Face tokenizer (vocab 640; byte-level, so no text is
  undecodable) with special tokens `<pad>`, `<s>` (BOS), `</s>` (EOS) and a chat template that
  ends every assistant turn with EOS.
- `spm/spm.model`: a sentencepiece BPE model (vocab 512, byte fallback, identity normalisation,
  unk=0, bos=1, eos=2, pad=3) for the plain template of `megatron_adadpo.data.templates`.

Both are trained on the bundled preference text only (examples/data/prefs_*.jsonl).
Usage: python examples/data/make_tokenizer.py  (deterministic; rewrites both)
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ChatML-like template: BOS once, role headers, EOS closes each assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus() -> list[str]:
    """Every prompt and completion string of the bundled data, one per entry."""
    texts: list[str] = []
    for name in ("prefs_train.jsonl", "prefs_eval.jsonl"):
        for line in (HERE / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            turns = []
            for value in row.values():
                if isinstance(value, str):
                    turns.append({"role": "user", "content": value})
                else:
                    turns.extend(value)
            texts.append("".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in turns))
    return texts


def build_hf(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out / "tokenizer"))


def build_spm(texts: list[str], out: Path) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (out / "spm").mkdir(exist_ok=True)
    (out / "spm" / "spm.model").write_bytes(model.getvalue())


def main(out: Path = HERE) -> None:
    texts = corpus()
    build_hf(texts, out)
    build_spm(texts, out)


if __name__ == "__main__":
    main()
