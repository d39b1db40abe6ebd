"""``torchrec-mm experiment`` prepare steps of QARM: ``qarm_align`` and ``qarm_codes``.

``qarm_align`` options: ``run`` (a ranker run for the history pairs, e.g.
``"{prepare}/base_run"``; optional) and any :class:`~torchrec_mm.qarm.align.AlignConfig`
field. ``qarm_codes`` options: ``reps`` (``aligned.safetensors`` of an align step or a
content store directory), ``codebook_items`` (``all``/``train``) and the fields of
:class:`~torchrec_mm.qarm.codes.VQConfig` (prefixed ``vq_``) and
:class:`~torchrec_mm.qarm.codes.RQConfig` (prefixed ``rq_``), e.g. ``vq_k: 25``,
``rq_levels: 6``, ``rq_codebook_size: 64``.
"""

import os
from typing import Any, Dict

from torchrec_mm.experiment import register_step


@register_step("qarm_align")
def qarm_align_step(data: str, out: str, options: Dict[str, Any],
                    train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.qarm.align import METRICS_FILE, REPS_FILE, AlignConfig
    from torchrec_mm.qarm.cli import run_align

    opts = dict(options)
    run = opts.pop("run", None)
    done = os.path.join(out, METRICS_FILE)
    if not os.path.exists(done):
        run_align(data, out, AlignConfig(**opts), run, progress=False)
    return {"reps": os.path.join(out, REPS_FILE)}


@register_step("qarm_codes")
def qarm_codes_step(data: str, out: str, options: Dict[str, Any],
                    train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.qarm.codes import (RQConfig, VQConfig, build_codes, load_codes,
                                        load_representations, save_codes)
    from torchrec_mm.qarm.codes_cli import train_item_mask

    opts = dict(options)
    if "reps" not in opts:
        raise ValueError("experiment step qarm_codes needs option 'reps'")
    reps_path = opts.pop("reps")
    which = opts.pop("codebook_items", "train")
    vq = VQConfig(**{k[3:]: v for k, v in opts.items() if k.startswith("vq_")})
    rq = RQConfig(**{k[3:]: v for k, v in opts.items() if k.startswith("rq_")})
    unknown = [k for k in opts if not k.startswith(("vq_", "rq_"))]
    if unknown:
        raise ValueError(f"experiment step qarm_codes: unknown option(s) {unknown}")
    try:
        codes = load_codes(out)
    except (FileNotFoundError, ValueError):
        reps, has = load_representations(reps_path)
        mask = train_item_mask(data, reps.shape[0]) if which == "train" else None
        codes = build_codes(reps, has, vq, rq, codebook_mask=mask, progress=False)
        save_codes(codes, out)
    return {"codes": out, "vq_recall": codes.meta.get("vq_recall")}
