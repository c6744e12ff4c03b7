"""File checks: a seekable binary stream plus its declared name and MIME type in, a verdict out.

Pure: imports nothing of the bot. Callers that hold files encrypted pass a decrypting reader.
"""

from intake.check import check
from intake.verdict import Finding, Kind, Severity, Status, Verdict

__all__ = ["Finding", "Kind", "Severity", "Status", "Verdict", "check"]
