//! REST API tests against the real application (in-process, real listener, real database), each one run on
//! SQLite and on PostgreSQL.

mod helpers;

mod api_keys;
mod certificates;
mod devices;
mod errors;
mod ops;
mod presence;
mod shadow;
