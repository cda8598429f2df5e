"""The Celery app of the step workers: `celery -A persona_pipeline.worker worker`.

Broker, result backend and queue come from the variables the executor reads
(persona_pipeline.executors), so both sides agree and no URL is written to a file.
"""

import warnings

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task
from kombu import Queue

from persona_pipeline.executors import celery_app_args, celery_queue

# As on the command line: Dagster's beta notices, once per task, would fill the worker's log.
warnings.filterwarnings("ignore", category=Warning, module=r"dagster\..*")

app = make_app(celery_app_args())
# make_app declares only the queue `dagster`; a worker started without -Q listens on ours.
app.conf.task_queues = [
    Queue(celery_queue(), routing_key=f"{celery_queue()}.#", queue_arguments={"x-max-priority": 10})
]
execute_plan = create_task(app)
