# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The few helpers of diffusers' test tree that `test_schedulers.py` imports, so the copy runs without it.

`CaptureLogger` is copied unchanged from diffusers `tests/testing_utils.py` (commit
58eb52c0803ea9af3abec60841c2a093bdf1f951). The rest stands in for diffusers' own: `torch_device` is the CPU
(these tests run in seconds there); `is_staging_test` skips, as diffusers' does unless HUGGINGFACE_CO_STAGING is
set, because the push-to-Hub tests need the Hub's staging server (this suite never touches the network), so
`TOKEN` and `USER` are never used (no token is copied).
"""

import logging
from io import StringIO

import pytest

torch_device = "cpu"
TOKEN = None
USER = "__DUMMY_TRANSFORMERS_USER__"


def is_staging_test(test_case):
    return pytest.mark.skip("needs the Hugging Face Hub's staging server")(test_case)


class CaptureLogger:
    """
    Args:
    Context manager to capture `logging` streams
        logger: 'logging` logger object
    Returns:
        The captured output is available via `self.out`
    Example:
    ```python
    >>> from diffusers import logging
    >>> from diffusers.utils.testing_utils import CaptureLogger

    >>> msg = "Testing 1, 2, 3"
    >>> logging.set_verbosity_info()
    >>> logger = logging.get_logger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.py")
    >>> with CaptureLogger(logger) as cl:
    ...     logger.info(msg)
    >>> assert cl.out, msg + "\n"
    ```
    """

    def __init__(self, logger):
        self.logger = logger
        self.io = StringIO()
        self.sh = logging.StreamHandler(self.io)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.sh)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.sh)
        self.out = self.io.getvalue()

    def __repr__(self):
        return f"captured: {self.out}\n"
