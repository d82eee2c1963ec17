"""The kserve SDK, imported with our command line hidden from it.

``kserve.model_server`` parses ``sys.argv`` with its own flags when it is first imported (``parse_known_args``);
our flags' prefixes could pass for abbreviations of its own, so it sees only the program name.
"""

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

__all__ = ["InferOutput", "InferRequest", "InferResponse", "InvalidInput", "kserve"]
