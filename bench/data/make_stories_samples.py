"""Source-domain text for stories260K, whose TinyStories training data is not in ../shared:
stories sampled from the model itself (temperature 1.0, from BOS). Its loss on them rising
during fine-tuning is forgetting, the same way the Debian model's loss on held-out Debian prose is.

    python bench/data/make_stories_samples.py CONVERTED_STORIES260K_DIR bench/data/stories260k_samples.txt
"""

import sys

import torch

from dirtune.models.lora import load_for_inference

model, tok = load_for_inference(sys.argv[1])
torch.manual_seed(0)
bos = torch.full((200, 1), tok.bos_token_id)
with torch.no_grad():
    out = model.generate(bos, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
texts = [" ".join(tok.decode(row, skip_special_tokens=True).split()) for row in out]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    f.writelines(t + "\n" for t in texts if len(t) > 40)
