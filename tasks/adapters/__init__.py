"""Adapters: the glue to the outside tools, apart from the stage tasks in ``tasks/``.

``tracking`` (the MLflow store, runs, downloads), ``gx`` (Great Expectations),
``pyfunc_model`` (the served MLflow model), ``serve`` and ``scoring_app`` (the scoring-server
process and its guard), ``stage_io`` (model hand-off between containers), ``history``
(`transfer runs`) and ``mlflow_users`` (the basic-auth user of a tracking server).
"""
