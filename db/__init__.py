"""flashtune's config database: the shared key/config types, the store and the exchange file."""
from .arch import ARCH_SMEM, normalize_arch, smem_limit
from .paths import default_url
from .rows import DamagedRow, DamagedRowWarning
from .store import (DatabaseCorruptError, DatabaseLockedError, DatabaseUnavailableError, RunInfo,
                    SchemaVersionError, StaleRun, Store, StoreError, TrialRecord, Winner, load_winners,
                    migrate_database)
from .errors import DatabaseURLError
from .types import DTYPES, HEAD_DIMS, OPS, OUTCOMES, Config, InvalidField, Key, normalize_dtype

__all__ = ["ARCH_SMEM", "DTYPES", "HEAD_DIMS", "OPS", "OUTCOMES", "Config", "DamagedRow", "DamagedRowWarning",
           "DatabaseCorruptError", "DatabaseLockedError", "DatabaseURLError", "DatabaseUnavailableError",
           "InvalidField", "Key", "RunInfo", "SchemaVersionError", "StaleRun", "Store", "StoreError",
           "TrialRecord", "Winner", "default_url", "load_winners", "migrate_database",
           "normalize_arch", "normalize_dtype", "smem_limit"]
