"""Run with the Airflow environment's python: load the DAG and print its structure."""

import json
import sys

from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    sys.exit(json.dumps(bag.import_errors))
dag = bag.dags["kto_cache"]  # parsed only: no metadata database needed
print(json.dumps({
    "tasks": sorted(dag.task_ids),
    "downstream": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
    "mapped": sorted(t.task_id for t in dag.tasks if getattr(t, "is_mapped", False)),
    "retries": {t.task_id: t.retries for t in dag.tasks},
    "params": sorted(dag.params.keys()),
    "schedule": str(dag.schedule),
}))
