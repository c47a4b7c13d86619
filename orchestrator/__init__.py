"""orchestrator: one YAML → validated plan → distributed training run → W&B.
The layers are subpackages (docs/architecture.md); importing the package quiets torchao's
import-time logging in every process (common/quiet.py)."""

from orchestrator.common.quiet import quiet_torchao

__version__ = "0.1.0"

quiet_torchao()
