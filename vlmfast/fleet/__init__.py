"""vlmfast.fleet: audit hundreds of models in one resumable job.

=========================  ==================================================================================
``AuditStore``             the SQLite results store (WAL; one table per audit; ``done`` markers; failures;
                           schema-versioned, table-driven migrations); ``settings_key``, ``data_fingerprint``
``load_manifest``          a ``manifest.yaml`` of models (base / finetune folders / checkpoints), validated;
``write_manifest``         its writer; ``ManifestEntry``, ``model_key`` (streamed SHA-256), ``load_entry``
``audit_fleet``            every model x audit x split into the store, only what is missing (``force`` to redo);
                           ``AUDITS`` (calibration, rationality, spurious), ``build_splits``, ``FleetSummary``
=========================  ==================================================================================

The command line: ``vlmfast audit --manifest runs/manifest.yaml --audits calibration,rationality,spurious
--db audit.sqlite``. Importing this package imports no model code; the audits import theirs when they run.
"""

from vlmfast.fleet.manifest import (KINDS, LoadedModel, ManifestEntry, checkpoint_files, load_entry, load_manifest,
                                    model_key, write_manifest)
from vlmfast.fleet.runner import (AUDITS, DEFAULT_SPLITS, Audit, FleetSummary, ModelReport, RunOptions, Split,
                                  audit_fleet, build_splits, resolve_settings)
from vlmfast.fleet.store import (AUDIT_TABLES, SCHEMA_VERSION, AuditStore, SchemaVersionError, data_fingerprint,
                                 settings_key)

__all__ = ["AUDITS", "AUDIT_TABLES", "Audit", "AuditStore", "DEFAULT_SPLITS", "FleetSummary", "KINDS",
           "LoadedModel", "ManifestEntry", "ModelReport", "RunOptions", "SCHEMA_VERSION", "SchemaVersionError",
           "Split", "audit_fleet", "build_splits", "checkpoint_files", "data_fingerprint", "load_entry",
           "load_manifest", "model_key", "resolve_settings", "settings_key", "write_manifest"]
