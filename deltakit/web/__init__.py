"""deltakit in the browser: the interactive module picker and the visual delta report.

* :class:`Picker` (``deltakit pick MODEL``, ``LoraModel(model, interactive_modify=True)``): choose the modules a delta
  modifies on a local page, with a live exact preview; returns compact ``modified_modules`` patterns.
* :func:`delta_report` (``deltakit report DIR --html out.html``): where a delta sits, its parameters per layer and
  site type, and the size of each site's update, as a self-contained HTML page and a PNG.

Everything is served by the standard library, on 127.0.0.1 with a random token (see docs/web.md).
"""

from .patterns import compact_patterns, verify_patterns
from .picker import Picker, PickerCancelled, PickResult
from .report import delta_report, report_data, write_report_html, write_report_png
from .server import LocalServer

__all__ = [
    "LocalServer",
    "PickResult",
    "Picker",
    "PickerCancelled",
    "compact_patterns",
    "delta_report",
    "report_data",
    "verify_patterns",
    "write_report_html",
    "write_report_png",
]
