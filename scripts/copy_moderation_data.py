"""Copy the moderation DEV data the local moderator's heads are trained on into data/moderation/.

Run once from the repo root (the copy is committed; this documents how it was made)::

    python scripts/copy_moderation_data.py /work/shared/data/moderation

Every row of each ``*.dev.jsonl`` file is kept, except Davidson's tweets: the 3,000 rows with the
smallest sha256 of their ``id`` (a fixed, reproducible sample; alt-profanity-check, the second
signal, was trained on that dataset already). Fields kept: ``id``, ``text``, ``labels``,
``flagged`` and, for HateCheck, the template id (``group``: cases of one template stay together in
cross-validation). Texts are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DAVIDSON_ROWS = 3000
OUT = Path(__file__).resolve().parent.parent / "data" / "moderation"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else Path("/work/shared/data/moderation")
    OUT.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dev.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.name.startswith("davidson"):
            rows = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:DAVIDSON_ROWS]
            rows.sort(key=lambda r: r["id"])
        out = []
        for r in rows:
            kept = {"id": r["id"], "text": r["text"], "labels": r["labels"], "flagged": r["flagged"]}
            templ = (r.get("meta") or {}).get("templ_id")
            if templ is not None:
                kept["group"] = f"templ-{templ}"
            out.append(json.dumps(kept, ensure_ascii=False))
        (OUT / path.name).write_text("\n".join(out) + "\n", encoding="utf-8")
        sys.stdout.write(f"{path.name}: {len(out)} rows\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
