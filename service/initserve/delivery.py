"""The old name of preparation.py, kept only while initserve_client's in-process path imports it
(``from initserve.delivery import Rejected, prepare, dry_run_answer``); delete it once that path
goes through the package's public entry point (issue 24, item 1). Nothing in the service
imports it."""

from initserve.exceptions import Rejected
from initserve.preparation import dry_run_answer, prepare

__all__ = ["Rejected", "dry_run_answer", "prepare"]
