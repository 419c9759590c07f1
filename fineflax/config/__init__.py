"""The config layer: the schema and defaults of every key (`schema`), validation
(`validation`), `:smoke` (`smoke`), the resume policy (`resume`), command-line overrides
(`overrides`), the reference table (`reference`), and the checks other layers register
(`registry`). It imports nothing of fineflax but `errors`."""

from fineflax.config.fields import METRICS, Field
from fineflax.config.overrides import apply_overrides, check_override_flags, split_overrides
from fineflax.config.phase_schema import PHASE_SCHEMA, phase
from fineflax.config.reference import reference_table
from fineflax.config.resume import changes_on_resume
from fineflax.config.schema import SCHEMA, default_config
from fineflax.config.smoke import finish, smoke
from fineflax.config.validation import from_dict, resolve_mode, to_dict, validate
from fineflax.errors import ConfigError

__all__ = [
    'ConfigError',
    'Field',
    'METRICS',
    'PHASE_SCHEMA',
    'SCHEMA',
    'apply_overrides',
    'changes_on_resume',
    'check_override_flags',
    'default_config',
    'finish',
    'from_dict',
    'phase',
    'reference_table',
    'resolve_mode',
    'smoke',
    'split_overrides',
    'to_dict',
    'validate',
]
