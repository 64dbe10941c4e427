"""Tools that run models over data: caption scoring, filtering and recaptioning, POA sub-network
extraction, attention-pattern analysis (NMI per layer); text embedding and sampling later. They sit
above zoo.data, zoo.eval and zoo.engine, so the data layer stays free of models."""
