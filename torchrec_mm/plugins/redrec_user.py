"""``redrec_user``: the RED-Rec user-tower interests as a ranker feature. Registered
here so that ``get_plugin("redrec_user")`` finds it by name; the implementation lives in
:mod:`torchrec_mm.redrec.user_features`."""

from torchrec_mm.redrec.user_features import RedRecUserPlugin  # noqa: F401
