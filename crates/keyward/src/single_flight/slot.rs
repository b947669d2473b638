//! A service's flight table, typed by the inner service's result, kept behind a
//! type-erased slot because the layer does not know that type.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use super::flight::FlightTable;

/// The flight table of a service, created on the first request: its type depends on
/// the inner service's response and error types, which the layer does not know.
#[derive(Default)]
pub(crate) struct TableSlot(OnceLock<ErasedTable>);

struct ErasedTable {
    table: Arc<dyn Any + Send + Sync>,
    len: fn(&(dyn Any + Send + Sync)) -> usize,
}

impl TableSlot {
    /// The table for flights yielding `T`; `None` if the slot already holds another
    /// type's table (one service called with two request body types).
    pub(crate) fn get<T: Send + 'static>(&self) -> Option<Arc<FlightTable<T>>> {
        let erased = self.0.get_or_init(|| ErasedTable {
            table: Arc::new(FlightTable::<T>::new()),
            len: |table| {
                table
                    .downcast_ref::<FlightTable<T>>()
                    .map_or(0, FlightTable::len)
            },
        });
        erased.table.clone().downcast().ok()
    }

    /// Flights in progress.
    pub(crate) fn len(&self) -> usize {
        self.0
            .get()
            .map_or(0, |erased| (erased.len)(&*erased.table))
    }
}
