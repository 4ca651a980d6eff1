"""A local SageMaker multi-model endpoint around tritonserver's own SageMaker front end."""
