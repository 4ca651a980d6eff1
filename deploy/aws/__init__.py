"""The AWS path: archives, S3 upload, the SageMaker endpoint."""
