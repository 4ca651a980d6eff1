"""Operations: make stats and the Grafana dashboard."""
