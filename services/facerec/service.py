"""The face service declares itself (read by the core, the gateway and the workers; no ML import)."""

from percept.services import BuiltinModel, JobKind, Service, WorkerPool

DLIB = "dlib 20: HOG or CNN (mmod) detector, 5/68-point landmarks, ResNet 128-d embeddings (face_recognition_models)"
PREDICTORS = "services.facerec.predictors"
FINALIZERS = "services.facerec.finalizers"

SERVICE = Service(
    name="facerec",
    job_kinds=(
        JobKind("faces_detect", queue="facerec", task="percept.faces_detect", default_model="dlib-face-detector",
                deterministic=True),
        JobKind("faces_verify", queue="facerec", task="percept.faces_verify", default_model="dlib-face-verifier",
                deterministic=True),
        JobKind("faces_enroll", queue="facerec", task="percept.faces_enroll", default_model="dlib-face-enroller",
                finalizer=f"{FINALIZERS}:enroll_face"),
        JobKind("faces_identify", queue="facerec", task="percept.faces_identify",
                default_model="dlib-face-identifier", finalizer=f"{FINALIZERS}:identify_faces"),
        JobKind("memes", queue="facerec", task="percept.memes", default_model="fer-meme-maker",
                finalizer=f"{FINALIZERS}:store_meme"),
    ),
    # One registry entry per job kind, each served by its predictor class.
    models=(
        BuiltinModel("dlib-face-detector", "faces_detect", f"{PREDICTORS}:FaceDetectPredictor",
                     card={"description": DLIB + "; FER2013 mini-Xception expressions (fer) on TensorFlow"}),
        BuiltinModel("dlib-face-enroller", "faces_enroll", f"{PREDICTORS}:FaceEmbedPredictor",
                     metrics={"lfw_accuracy": 0.9938}, card={"description": DLIB}),
        BuiltinModel("dlib-face-verifier", "faces_verify", f"{PREDICTORS}:FaceVerifyPredictor",
                     metrics={"lfw_accuracy": 0.9938}, card={"description": DLIB}),
        BuiltinModel("dlib-face-identifier", "faces_identify", f"{PREDICTORS}:FaceIdentifyPredictor",
                     metrics={"lfw_accuracy": 0.9938}, card={"description": DLIB}),
        BuiltinModel("fer-meme-maker", "memes", f"{PREDICTORS}:MemePredictor",
                     card={"description": "main face's FER2013 expression (mini-Xception, fer) -> a curated "
                                          "caption rendered on the photo"}),
    ),
    workers=(WorkerPool("facerec", queues=("facerec",)),),
    requirements=("requirements.txt", "requirements-nodeps.txt"),
    device="services.facerec.device:serving_device",
)
