"""The edit service: the model as this process loads it (`model`), the one thread that runs it (`runner`), input
images (`inputs`), one edit from validated input to output (`edit`), and the Prometheus counters (`metrics`)."""
