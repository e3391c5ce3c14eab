"""gradprobe: lint a neural network at initialisation.

The public surface: `diagnose`, `Report`, `Finding`, `Severity`, `Client`. Everything else is
importable but not promised.
"""

from gradprobe.diagnostics.report import Finding, Report, Severity

__version__ = "0.1.0"

__all__ = ["Finding", "Report", "Severity", "__version__"]
