-- First start of the compose postgres service: POSTGRES_DB made "mlflow"; Prefect gets its own.
CREATE DATABASE prefect OWNER transfer;
