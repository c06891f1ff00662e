"""Doctests of integration modules need their framework: without the extra, skip collecting them
(their tests skip themselves with ``pytest.importorskip``)."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("stabwatch/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    collect_ignore.append("stabwatch/integrations/transformers.py")
