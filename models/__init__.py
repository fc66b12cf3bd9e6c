"""Torch, diffusers and transformers code: the generators, the classifier and their inputs.

transformers warns, on the first use of an image processor, that torchvision is missing and
should be installed. The PIL processor it falls back to is the one this project uses, and
PyPI's torchvision does not import beside the pinned torch: the advice would break an
install, so every process that imports these modules drops that one record (stdlib logging
only: importing this package loads nothing heavy)."""

from __future__ import annotations

import logging

TORCHVISION_ADVICE = "requires torchvision (not installed)"


def _not_torchvision_advice(record: logging.LogRecord) -> bool:
    return TORCHVISION_ADVICE not in record.getMessage()


# the logger transformers' lazy module warns on (transformers/utils/import_utils.py)
logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_advice)
