// ESM entry of @ferry/runtime: the same module as index.js.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const ferry = require('./index.js');

export const {
  boot, provision, restore, attach, list, listenForMigration, pullImage, images, removeImage, errorCodes, FerryError, Vm, Child,
  Image, Pool, pushBundle, pullBundle,
} = ferry;
export default ferry;
