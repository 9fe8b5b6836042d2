"""Coverage of a target set: a target is covered if it fires (pooled activation > 0) on at least one row."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def coverage_from_codes(codes: sp.csr_matrix, target_ids: list[int]) -> dict:
    """{coverage, n_targets, covered, uncovered, counts: {id: rows firing}} for CSR codes (rows x d_sae)."""
    ids = [int(t) for t in target_ids]
    if codes.shape[0] and ids:
        counts = np.asarray((codes[:, ids] > 0).sum(axis=0)).ravel()
    else:
        counts = np.zeros(len(ids), dtype=np.int64)
    covered = [t for t, c in zip(ids, counts) if c > 0]
    return {"coverage": len(covered) / len(ids) if ids else float("nan"), "n_targets": len(ids),
            "n_covered": len(covered), "covered": covered, "uncovered": [t for t in ids if t not in set(covered)],
            "rows": int(codes.shape[0]), "counts": {str(t): int(c) for t, c in zip(ids, counts)}}


def coverage_of_texts(fx, texts: list[str], target_ids: list[int], *, progress: bool = False) -> dict:
    codes = fx.transform(texts, progress=progress) if texts else sp.csr_matrix((0, fx.sae.cfg.d_sae))
    return coverage_from_codes(codes, target_ids)


def format_coverage(rep: dict, name: str = "data") -> str:
    lines = [f"{name}: {rep['n_covered']}/{rep['n_targets']} targets covered ({rep['coverage']:.1%}) by {rep['rows']} rows"]
    if rep["uncovered"]:
        shown = rep["uncovered"][:30]
        lines.append(f"  uncovered: {shown}{' ...' if len(rep['uncovered']) > 30 else ''}")
    return "\n".join(lines)
