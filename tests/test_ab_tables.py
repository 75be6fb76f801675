"""benchmarks/ab_tables.py's candidate lists from tune outputs (plain JSON, no GPU): every candidate
is a valid table change, one per distinct tuned config, and the program cap leaves out the rest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.backends.gemm_table import DecodeGemmTable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ab_tables import candidates_from_tune  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def test_candidates_from_the_fold_tune_are_valid_table_changes() -> None:
    doc = json.loads((RESULTS / "gpu_h100_bec2c1a_retune_norm_gemm_entries.json").read_text())
    cands = candidates_from_tune(doc)
    per_shape = {}
    for name, entries in cands.items():
        assert len(entries) == 1
        DecodeGemmTable(entries)  # known op, known launch keys
        per_shape.setdefault(name.split("/")[0], []).append(entries[0]["config"])
    for e in doc["table"]:  # the best and every runner-up, each once
        configs = per_shape[e["name"]]
        assert e["folded_config"] in configs
        assert all(c in configs for _, c in e["next_best"])
        assert len(configs) == len({json.dumps(c, sort_keys=True) for c in configs})
    capped = candidates_from_tune(doc, max_programs=132)
    assert capped and len(capped) < len(cands)
    assert all(entries[0]["config"]["num_programs"] <= 132 for entries in capped.values())


def test_candidates_from_the_gemv_and_gated_tunes() -> None:
    for path in ("gpu_h100_5ce9af7_gemv_entries.json", "gpu_h100_79c6568_gated_norm_entries.json"):
        cands = candidates_from_tune(json.loads((RESULTS / path).read_text()))
        assert cands
        for entries in cands.values():
            table = DecodeGemmTable(entries)
            e = entries[0]
            assert (
                table.lookup(1, e["N"], e["K"], e.get("bias", False), op=e.get("op", "linear")) == e["config"]
            )


def test_candidate_files_are_valid_table_changes_and_backend_switches() -> None:
    """Every candidate of benchmarks/candidates/*.json: valid table entries (known op and launch
    keys) and backend attributes the Triton backend has."""
    from ab_tables import load_candidates, split_candidate

    switches = {
        "fused_gdn_decode",
        "fused_gdn_norm",
        "fused_gdn_launch",
        "rope_in_swa",
        "swa_reduce_tail",
        "swa_min_split",
        "swa_tail_max_splits",
        "embed_in_rope_tables",
        "split_k_into_norm",
        "num_sms",
    }
    files = sorted((ROOT / "benchmarks" / "candidates").glob("*.json"))
    assert files
    for path in files:
        cands = load_candidates([str(path)], [], None)
        assert cands
        for cand in cands.values():
            entries, attrs = split_candidate(cand)
            DecodeGemmTable(entries)
            assert entries or attrs
            assert set(attrs) <= switches
