//! Shared helpers of Strata's benchmarks and load generators.
