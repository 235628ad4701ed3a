//! Test harness shared by the end-to-end tests in `tests/tests/`: starting
//! real `stratad` processes on free loopback ports, talking to them over real
//! sockets, and stopping them with signals.
