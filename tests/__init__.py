"""The test suite: `unit/<package>/` mirrors `sdp_cli/<package>/`, `integration/` starts real vLLM
servers (marked `vllm`). Folders are packages, so test modules import each other by their full
name (`tests.unit.trainer.test_actor`) and may share a basename."""

from pathlib import Path

# The repository's root, for the files tests read beside the package (docs/, scripts/, conf/).
REPO = Path(__file__).resolve().parent.parent
