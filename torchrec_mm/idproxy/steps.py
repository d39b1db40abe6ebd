"""``torchrec-mm experiment`` prepare step of IDProxy: ``idproxy_fit`` (stage 1).

Options: ``run`` (the base ranker run whose item-ID table is the target, e.g.
``"{prepare}/base_run"``) and any :class:`~torchrec_mm.idproxy.coarse.CoarseFitConfig`
field.
"""

from typing import Any, Dict

from torchrec_mm.experiment import register_step


@register_step("idproxy_fit")
def idproxy_fit_step(data: str, out: str, options: Dict[str, Any],
                     train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.idproxy.coarse import CoarseFitConfig, fit_coarse

    opts = dict(options)
    if "run" not in opts:
        raise ValueError("experiment step idproxy_fit needs option 'run' (the base ranker run)")
    run = opts.pop("run")
    metrics = fit_coarse(data, run, out, CoarseFitConfig(**opts), progress=False)
    return {"proxies": out, "fit": metrics}
