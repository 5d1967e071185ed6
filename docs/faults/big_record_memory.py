"""Peak memory of tokenising one 10 MB alpaca record (issue 13 item 11), before and after the cut.

    python docs/faults/big_record_memory.py          # prints one line per mode

Each mode runs in a fresh process (peak RSS is per process): 'whole' tokenises the whole record
and truncates after (the old path), 'cut' passes max_length so only a bounded prefix is tokenised.
The tokenizer is tok512 (stories260K's SentencePiece BPE) from ../shared/bench.
"""
import json
import resource
import subprocess
import sys
from pathlib import Path

TOK = Path(__file__).resolve().parents[3] / "shared" / "bench" / "tok512.model"


def child(mode: str) -> None:
    from dirtune.data.records import Alpaca
    from dirtune.data.templates import render
    from dirtune.data.tokenize import encode_examples
    from dirtune.models.loading import load_tokenizer

    tok = load_tokenizer(TOK)
    words = "once upon a time there was a little girl who liked to play in the park".split()
    text = " ".join(words[i % len(words)] for i in range(3_000_000))[: 10 * 2**20]  # 10 MiB
    ex = render(Alpaca("Summarise this.", "", text, 1), "llama2")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    [(ids, _)] = encode_examples(tok, [ex], max_length=512 if mode == "cut" else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "record_chars": len(text), "ids_before_truncation": len(ids),
                      "first_512_ids_sum": sum(ids[:512]), "peak_rss_gib": round(peak / 2**20, 3),
                      "rise_gib": round((peak - before) / 2**20, 3)}))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        for mode in ("whole", "cut"):
            subprocess.run([sys.executable, __file__, mode], check=True)
