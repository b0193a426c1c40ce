"""vlmfast.fleet: audit hundreds of models in one resumable job.

=========================  ==================================================================================
``AuditStore``             the SQLite results store (WAL; one table per audit; ``done`` markers; failures;
                           schema-versioned, table-driven migrations); ``settings_key``, ``data_fingerprint``
``load_manifest``          a ``manifest.yaml`` of models (base / finetune folders / checkpoints / prompt
                           learners on their backbone), validated;
``write_manifest``         its writer; ``ManifestEntry``, ``model_key`` (streamed SHA-256), ``load_entry``
``audit_fleet``            every model x audit x split into the store, only what is missing (``force`` to redo);
                           ``AUDITS`` (calibration, rationality, spurious), ``build_splits``, ``FleetSummary``
``build_report``           the static HTML report of a store (sortable tables, per-method summary, scatter
                           plots, failures, provenance) and CSV / Parquet exports (``vlmfast.fleet.report``)
``run_plan``               every run of a ``plan.yaml`` (``load_plan``: methods x hyper-parameters x seeds x data
                           variants, expanded into ``PlanRun`` objects with stable ids) into its own folder (resumable:
                           ``DONE`` markers), then the fleet's ``manifest.yaml`` (``vlmfast.fleet.plan``)
``audit_fleet_ray``        ``audit_fleet`` with one Ray task per model (the ``[distributed]`` extra; same store)
=========================  ==================================================================================

The command lines: ``vlmfast finetune --plan plan.yaml --out runs/``, then ``vlmfast audit --manifest
runs/manifest.yaml --audits calibration,rationality,spurious --db audit.sqlite``, then ``vlmfast report
audit.sqlite --out report/``. Importing this package imports no model code; the audits import theirs when they run.
"""

from vlmfast.fleet.distributed import audit_fleet_ray
from vlmfast.fleet.manifest import (KINDS, LoadedModel, ManifestEntry, checkpoint_files, load_entry, load_manifest,
                                    model_key, write_manifest)
from vlmfast.fleet.plan import Plan, PlanRun, PlanSummary, RunReport, load_plan, plan_from_dict, run_plan
from vlmfast.fleet.report import build_report, write_report
from vlmfast.fleet.runner import (AUDITS, DEFAULT_SPLITS, Audit, FleetSummary, ModelReport, RunOptions, Split,
                                  audit_fleet, build_splits, resolve_settings)
from vlmfast.fleet.store import (AUDIT_TABLES, SCHEMA_VERSION, AuditStore, SchemaVersionError, data_fingerprint,
                                 settings_key)

__all__ = ["AUDITS", "AUDIT_TABLES", "Audit", "AuditStore", "DEFAULT_SPLITS", "FleetSummary", "KINDS", "LoadedModel",
           "ManifestEntry", "ModelReport", "Plan", "PlanRun", "PlanSummary", "RunOptions", "RunReport",
           "SCHEMA_VERSION", "SchemaVersionError", "Split", "audit_fleet", "audit_fleet_ray", "build_report",
           "build_splits",
           "checkpoint_files", "data_fingerprint", "load_entry", "load_manifest", "load_plan", "model_key",
           "plan_from_dict", "resolve_settings", "run_plan", "settings_key", "write_manifest", "write_report"]
